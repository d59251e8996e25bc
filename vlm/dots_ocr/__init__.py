"""dots.ocr (rednote-hilab/dots.ocr) implemented natively: modeling, input processing, layout parsing, adapter."""

"""The ``chatvlm`` command line: serve, OCR files and folders, chat, and manage models.

It is a client of the project's two public ways in: the in-process services (the same ones
the server builds) or the HTTP API through ``scripts.chatvlm_client``. Nothing else.
"""

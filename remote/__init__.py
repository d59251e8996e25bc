"""Remote engines: a registry model of kind ``remote`` generates on an OpenAI-protocol server
(vLLM, SGLang, llama.cpp's server, ``transformers serve``, another ChatVLM) instead of on local
weights. It plugs in below the generation service, so every surface works on it unchanged."""

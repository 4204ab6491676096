"""repomem.native: the C extension that splices KV memory into llama.cpp (work in progress)."""

"""llama-cpp-python's own OpenAI server, for `repomem bench serve` to compare against.

`python -m repomem.bench.serve_baseline [--no-extra-bufts] <llama_cpp.server arguments>`. That
server has no option for llama.cpp's weight repacking, which crashes `llama_decode` on some CPUs
(see `repomem.core.amx_guard`); with `--no-extra-bufts` it loads the model with repacking off, the
way repomem itself does there, so both sides run the same kernels.
"""

from __future__ import annotations

import sys


def main() -> None:
    if "--no-extra-bufts" in sys.argv:
        sys.argv.remove("--no-extra-bufts")
        import llama_cpp
        import llama_cpp.llama_cpp as low_level

        default = low_level.llama_model_default_params

        def params():  # noqa: ANN202 - a ctypes struct
            p = default()
            p.use_extra_bufts = False
            return p

        low_level.llama_model_default_params = params  # what llama_cpp.Llama calls
        llama_cpp.llama_model_default_params = params
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main()

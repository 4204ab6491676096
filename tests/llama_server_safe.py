"""Run llama-cpp-python's OpenAI-compatible server with weight repacking off.

The server has no option for `use_extra_bufts`, and repacking crashes llama_decode on AMX CPUs (the
machine CI runs on), so the test starts the server through this shim instead of `-m llama_cpp.server`.
"""

import llama_cpp
import llama_cpp.llama_cpp as low_level

_default = low_level.llama_model_default_params


def _params():
    p = _default()
    p.use_extra_bufts = False
    return p


low_level.llama_model_default_params = _params  # what llama_cpp.Llama calls
llama_cpp.llama_model_default_params = _params

if __name__ == "__main__":
    from llama_cpp.server.__main__ import main

    main()

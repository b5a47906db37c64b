"""The workflows, and the Python API that the CLI, benchmarks, tutorials and tests call.

============================  ==============================================================
``compile_model(opts, out)``  model file -> artifact folder (:mod:`.compile`)
``load(path)``                a compiled artifact, with the TVM runtime only
``generate(art, prompt)``     greedy (speculative) generation; iterate for text as accepted
``Chat(art)``                 a multi-turn conversation on one KV cache
``bench(path, widths)``       decode speed per width, roofline, kernel breakdown
``tune(model, units, out)``   profile, fit cost models, plan (plan.json)
``calibrate_model(...)``      Medusa heads by self-distillation
============================  ==============================================================

Names are imported on first use: loading and generating needs only a runtime-only TVM
(``TVM_USE_RUNTIME_LIB=1``), so importing this package must not import the compiler. No
module is named like an API name: importing a submodule sets the package's attribute of its
name, which ``from hetcomp.driver import bench`` then returned instead of the function.
"""

import importlib

_API = {
    "CompileOptions": ".compile", "compile_model": ".compile",
    "load": ".text", "generate": ".text", "Chat": ".text",
    "bench": ".benchmark", "tune": ".tuning", "profile": ".profiling",
    "CalibrateOptions": ".calibrate", "calibrate_model": ".calibrate",
}
_RENAMED = {"load": "load_artifact", "tune": "tune_command", "profile": "profile_command"}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        module = importlib.import_module(_API[name], __name__)
        return getattr(module, _RENAMED.get(name, name))
    raise AttributeError(f"module 'hetcomp.driver' has no attribute {name!r}")

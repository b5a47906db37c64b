"""Generic import of any ``torch.nn.Module`` (models outside the LLaMA family).

``torch.export`` captures the module; TVM's ``from_exported_program`` turns it into Relax with
the weights bound as constants. The result is a plain Relax IRModule (function ``main``) that
:func:`hetcomp.codegen.build.compile_relax` builds for a target; the partition passes
accept it like our own model.
"""

from __future__ import annotations

from ..errors import HetcompError


def from_torch(module, example_inputs, dynamic_shapes=None):
    """Export ``module(*example_inputs)`` and import it as a Relax IRModule."""
    try:
        import torch
    except ImportError:
        raise HetcompError("from_torch needs the torch extra: pip install 'hetcomp[torch]'") from None
    from tvm.relax.frontend.torch import from_exported_program

    module = module.eval()
    with torch.no_grad():
        exported = torch.export.export(module, tuple(example_inputs),
                                       dynamic_shapes=dynamic_shapes)
    return from_exported_program(exported, unwrap_unit_return_tuple=True)

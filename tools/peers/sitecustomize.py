"""Shims that let mergekit-evolve (mergekit 0.1.5) run on this CPU-only machine, in every process of a run.

tools/peers/mke_driver.py runs with this folder on PYTHONPATH; Python imports ``sitecustomize`` at
start-up, so the driver and Ray's worker processes (started with the driver's environment) all get
these. Nothing is imported here up front: each fix is applied right after the module it concerns
is imported, and only where that module lacks what mergekit expects.

1. ``lm_eval.models.vllm_causallms`` (all modes): mergekit/evo/actors.py names
   ``lm_eval.models.vllm_causallms.VLLM`` in a class annotation at import time and
   mergekit/evo/monkeypatch.py imports that module on every evaluation. lm-eval 0.4.13 loads model
   modules only on demand (``AttributeError: module 'lm_eval.models' has no attribute
   'vllm_causallms'``) and that module imports vllm, which is not installed (no CPU wheel here:
   ``ModuleNotFoundError: No module named 'vllm'``). Where vllm is missing it is given as a stub
   holding an empty ``VLLM`` class, imported with ``lm_eval.models``; the HF backend is used, as
   mergekit-evolve does without ``--vllm``.
2. ``torch.cpu.empty_cache`` (``--no-in-memory``, the default): OnDiskMergeEvaluator calls
   ``get_torch_accelerator_module(device).empty_cache()``, which on the CPU is ``torch.cpu`` and
   has none (``AttributeError: module 'torch.cpu' has no attribute 'empty_cache'``): a no-op.
3. ``mergekit.io.tasks.ReturnTensor`` (``--in-memory``): its field ``tensor_task: Task[torch.Tensor]``
   refuses the ``ExecuteMergeMethodTask`` (a ``Task[Optional[torch.Tensor]]``) that
   ``MergePlanner.plan_in_memory`` gives it (``TypeError: Can't instantiate abstract class
   Task[Tensor] with abstract methods arguments, execute``), whatever the device: the field is
   re-declared as a plain ``Task``, as ``SaveTensor`` (the on-disk path) declares it.
4. ``lm_eval.models.huggingface.HFLM`` (``--no-in-memory``): mergekit's ``evaluate_model`` gives
   ``simple_evaluate`` no ``device``, lm-eval's HF backend then takes ``device="cuda"`` without
   asking whether CUDA is there, and loading the merged folder fails in transformers
   (``AssertionError: Torch not compiled with CUDA enabled``): without CUDA, that default is "cpu".
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

VLLM_STUB = "lm_eval.models.vllm_causallms"


def _after_lm_eval_models(module):
    if importlib.util.find_spec("vllm") is None:
        importlib.import_module(VLLM_STUB)


def _after_torch_cpu(module):
    if not hasattr(module, "empty_cache"):
        module.empty_cache = lambda: None


def _after_mergekit_io_tasks(module):
    from mergekit.graph import Task

    field = module.ReturnTensor.model_fields["tensor_task"]
    if field.annotation is not Task:
        field.annotation = Task
        module.ReturnTensor.model_rebuild(force=True)


def _after_lm_eval_huggingface(module):
    import functools

    import torch

    init = module.HFLM.__init__
    if torch.cuda.is_available() or getattr(init, "_cpu_default", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, device="cuda", **kwargs):
        init(self, *args, device="cpu" if device == "cuda" else device, **kwargs)

    __init__._cpu_default = True
    module.HFLM.__init__ = __init__


AFTER_IMPORT = {"lm_eval.models": _after_lm_eval_models, "torch.cpu": _after_torch_cpu,
                "mergekit.io.tasks": _after_mergekit_io_tasks,
                "lm_eval.models.huggingface": _after_lm_eval_huggingface}


class _VllmStubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        class VLLM:  # stand-in: never instantiated (mergekit-evolve runs without --vllm)
            AUTO_MODEL_CLASS = None

        module.VLLM = VLLM


class _ThenFix(importlib.abc.Loader):
    """The module as its own loader executes it, then the fix for it."""

    def __init__(self, loader, fix):
        self.loader, self.fix = loader, fix

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.fix(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != VLLM_STUB and name not in AFTER_IMPORT:
            return None
        sys.meta_path.remove(self)
        try:
            if name == VLLM_STUB:
                if importlib.util.find_spec("vllm") is not None:
                    return None  # vLLM is there: the real module
                return importlib.machinery.ModuleSpec(name, _VllmStubLoader())
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                spec.loader = _ThenFix(spec.loader, AFTER_IMPORT[name])
            return spec
        finally:
            sys.meta_path.insert(0, self)


sys.meta_path.insert(0, _Finder())

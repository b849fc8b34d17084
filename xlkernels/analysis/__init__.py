"""Analysis methods, grouped by concern (each imported on use):

- data: the parallel corpora and loaders for user files;
- tokens: encoding, batching and the per-token NLL every method scores with;
- align: cross-lingual alignment of representations (MEXA, ANC);
- heads/: LAHIS head importance and the soft head mask;
- neurons/: per-language neuron statistics, LAPE and the ternary classes, deactivation and forcing;
- steering/: saved plans, CLAIM head shifts, ITLC, INCLINE and the residual-stream injection they share;
- evaluation/: generation, language ID and the harness behind `xlkernels eval`;
- reproduce/: the papers' claims measured on one model (`xlkernels reproduce`);
- plots: the shared figures.

Modules that moved into a subpackage stay importable under their old flat names (`xlkernels.analysis.plan`
is `xlkernels.analysis.steering.plan`).
"""
import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "plan": "steering.plan", "shift": "steering.shift", "itlc": "steering.itlc", "incline": "steering.incline",
    "latent": "steering.latent", "soft_mask": "heads.soft_mask", "deactivation": "neurons.deactivation",
    "forcing": "neurons.forcing", "distributed": "neurons.distributed", "evaluate": "evaluation.evaluate",
    "generation": "evaluation.generation", "fit": "evaluation.fit", "eval_report": "evaluation.report",
    "langid": "evaluation.langid", "claims": "reproduce.claims", "reproduce_report": "reproduce.report",
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `xlkernels.analysis.<old name>` to the module it became (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, name = fullname.rpartition(".")
        if pkg == __name__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module):
        pass


if not any(isinstance(f, _OldNames) for f in sys.meta_path):
    sys.meta_path.append(_OldNames())

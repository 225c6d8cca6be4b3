"""Every method of the comparison behind one registry.

Prompt methods change only the prompt: `zero_shot` (no demonstrations), `icl` (k random demonstrations),
`rices` (the k support items whose images are most similar to the query's). Trained methods are modules with a
config, `attach(model) -> Handle`, a parameter count and their own file format (pipeline.methods.base); they are
fitted from ONE teacher cache by `mimic train -s train.method=NAME`. docs/methods.md says what each trains, its
teacher signal, its cost and where it differs from its authors' code.
"""

from __future__ import annotations

from pipeline.config import PROMPT_METHODS, parse_section
from pipeline.errors import MimicError
from pipeline.methods import hificl, live, lora, mimic, vectors
from pipeline.methods.base import Handle, MethodConfig, Trained

# name -> (class, default config); params.yaml's `methods` section holds one entry per name
TRAINED: dict[str, tuple[type[Trained], MethodConfig]] = {
    "mimic": (mimic.MimicShift, mimic.DEFAULT),
    "head_sharing_mu": (mimic.MimicShift, mimic.DEFAULT),
    "query_sharing_mu": (mimic.MimicShift, mimic.DEFAULT),
    "live": (live.Live, live.DEFAULT),
    "hificl": (hificl.HiFICL, hificl.DEFAULT),
    "lora": (lora.Lora, lora.LORA),
    "mimic_lora": (lora.MimicLora, lora.MIMIC_LORA),
    "tv": (vectors.TaskVector, vectors.VectorConfig(layers=None)),
    "fv": (
        vectors.FunctionVector,
        vectors.FunctionVectorConfig(layers=None, heads=10, mediation_prompts=16, seed=0),
    ),
}
METHODS = PROMPT_METHODS + tuple(TRAINED)

__all__ = ["Handle", "MethodConfig", "Trained", "METHODS", "PROMPT_METHODS", "TRAINED", "build_method"]


def method_class(name: str) -> type[Trained]:
    if name not in TRAINED:
        raise MimicError(f"unknown trained method {name!r}: choose one of {', '.join(TRAINED)}")
    return TRAINED[name][0]


def parse_method_config(name: str, mapping: dict, where: str) -> MethodConfig:
    """One method's section of params.yaml `methods`, strictly checked against its config dataclass."""
    return parse_section(method_class(name).Config, mapping, where)


def method_configs(sections: dict) -> dict[str, MethodConfig]:
    """Every section of params.yaml `methods` parsed; unknown names are refused in one line."""
    unknown = sorted(set(sections) - set(TRAINED))
    if unknown:
        raise MimicError(f"methods: unknown {unknown}; the trained methods are {', '.join(TRAINED)}")
    return {name: parse_method_config(name, section, f"methods.{name}") for name, section in sections.items()}


def build_method(name: str, config: MethodConfig, view, generator) -> Trained:
    """A freshly initialised `name` for the model seen through `view`."""
    return method_class(name).build(name, config, view, generator)

"""The model's shape: one typed config, read from `hparams.json` in one place."""
import dataclasses
import json
import os

from errors import UserError

# Legacy names from the original release, renamed when OpenAI recounted the parameters.
MODEL_ALIASES = {"117M": "124M", "345M": "355M"}


@dataclasses.dataclass(frozen=True)
class HParams:
    """GPT-2 hyperparameters, with the reference's names."""

    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"hparams {field.name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"hparams n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_json(cls, path):
        """Reads `hparams.json`; unknown keys are an error so typos do not pass silently."""
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path} is missing: download the model again with download_model.py") from None
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({e}): download the model again with download_model.py") from None
        names = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - names:
            raise UserError(f"{path} is not a GPT-2 hparams file (expected keys {sorted(names)})")
        # A missing key would fall back to 124M's value, and the checkpoint would take the blame.
        missing = sorted(names - set(values))
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}: download the model again with download_model.py")
        return cls(**values)

    def to_json(self):
        """The released files' layout: two-space indent, keys in this order."""
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


# The released checkpoints, by their current names.
SIZES = {
    "124M": HParams(n_layer=12, n_embd=768, n_head=12),
    "355M": HParams(n_layer=24, n_embd=1024, n_head=16),
    "774M": HParams(n_layer=36, n_embd=1280, n_head=20),
    "1558M": HParams(n_layer=48, n_embd=1600, n_head=25),
}


def resolve_model_name(model_name):
    """Maps legacy names (117M, 345M) to the current ones; other names pass unchanged."""
    return MODEL_ALIASES.get(str(model_name), str(model_name))


def model_dir(model_name, models_dir):
    """The directory of a model, under its name or the other name of a renamed release (the
    original downloader made models/117M); a missing one is a UserError that says how to get it."""
    models_dir = os.path.expanduser(os.path.expandvars(str(models_dir)))
    name = resolve_model_name(model_name)
    legacy = [old for old, new in MODEL_ALIASES.items() if new == name]
    for candidate in dict.fromkeys([str(model_name), name, *legacy]):
        path = os.path.join(models_dir, candidate)
        if os.path.isdir(path):
            return path
    if name in SIZES:
        hint = f"run: python download_model.py {name} --models_dir {models_dir}"
    else:
        hint = f"pass --models_dir and --model_name of a model directory (released models: {', '.join(SIZES)})"
    raise UserError(f"model '{name}' not found in '{models_dir}': {hint}")

"""One name for each idea (docs/architecture.md, "One name for each idea"): the public
signatures of tinylm use the same word for the same thing in every module."""

import importlib
import inspect
import pkgutil

import pytest

import tinylm
from tinylm.optim import lr_schedule
from tinylm.pretraining import PretrainConfig
from tinylm.training import TrainConfig


def public_callables():
    """(qualified name, function) for every public function and method of tinylm's modules."""
    for info in pkgutil.iter_modules(tinylm.__path__):
        if info.name in ("__main__", "cuda"):  # cuda.py imports CuPy's kernels lazily anyway
            continue
        module = importlib.import_module(f"tinylm.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{info.name}.{name}", obj
            elif inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if inspect.isfunction(member) and not attr.startswith("_"):
                        yield f"{info.name}.{name}.{attr}", member


SIGNATURES = {name: list(inspect.signature(fn).parameters) for name, fn in public_callables()}


@pytest.mark.parametrize("method", [
    "model.GPT.forward", "model.GPT.features", "model.GPT.logits", "model.GPT.generate",
    "bert.Bert.forward", "bert.Bert.features", "bert.Bert.pooled", "bert.Bert.classify",
])  # fmt: skip
def test_a_model_reads_a_batch_called_idx(method):
    assert SIGNATURES[method][1] == "idx", SIGNATURES[method]


@pytest.mark.parametrize("function", [
    "data.get_batch", "data.eval_windows", "data.count_eval_tokens", "training.evaluate",
])  # fmt: skip
def test_a_split_of_token_ids_is_called_data(function):
    assert "data" in SIGNATURES[function], SIGNATURES[function]


def test_no_public_function_outside_backend_py_takes_a_backend():
    # Users say "device" ("cpu" / "gpu"); the array module's name stays inside backend.py.
    offenders = [name for name, params in SIGNATURES.items()
                 if "backend" in params and not name.startswith("backend.")]  # fmt: skip
    assert offenders == []
    assert "device" in SIGNATURES["model.GPT.to"] and "device" in SIGNATURES["bert.Bert.to"]
    assert hasattr(TrainConfig(), "device") and hasattr(PretrainConfig(), "device")


def test_the_length_of_the_decay_has_one_name():
    assert "decay_steps" in inspect.signature(lr_schedule).parameters
    assert hasattr(TrainConfig(), "lr_decay_steps") and hasattr(PretrainConfig(), "lr_decay_steps")

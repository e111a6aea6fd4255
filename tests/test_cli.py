"""The strategy picked from a Lightning CLI run: by name, by class path, from YAML (a few steps each).

``tests/scripts/cli.py``'s ``main`` runs in this process with the arguments a user would type after
``python tests/scripts/cli.py``: the same parser and the same fit, without a new interpreter per case.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "cli.py"
COMMON = [
    "fit",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.max_steps=2",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
]


@pytest.fixture
def run_cli(capsys, monkeypatch):
    # A ZeRO-3 fit leaves DeepSpeed's linear in F.linear; later tests of this process expect torch's.
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    spec = importlib.util.spec_from_file_location("cli_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(*args: str) -> dict:
        capsys.readouterr()
        script.main([*COMMON, *args])
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.startswith("STRATEGY "))
        return json.loads(line.removeprefix("STRATEGY "))

    return run


def test_registered_name(run_cli):
    report = run_cli("--trainer.strategy=hybrid_engine_stage_2")
    assert report["class"] == "HybridEngineStrategy" and report["stage"] == 2
    assert report["engine"] == "HybridEngine" and report["calls"] == 1


def test_class_path_with_init_args(run_cli):
    report = run_cli(
        "--trainer.strategy=lightning_hybrid.HybridEngineStrategy",
        "--trainer.strategy.max_out_tokens=256",
        "--trainer.strategy.pin_parameters=false",
    )
    assert report["class"] == "HybridEngineStrategy" and report["stage"] == 3
    assert report["hybrid_engine"]["max_out_tokens"] == 256 and report["hybrid_engine"]["pin_parameters"] is False


@pytest.mark.parametrize(
    "class_path", ["lightning_hybrid.HybridEngineStrategy", "lightning_hybrid.strategy.HybridEngineStrategy"]
)
def test_yaml_config(tmp_path, class_path, run_cli):
    config = tmp_path / "run.yaml"
    config.write_text(
        "trainer:\n"
        "  strategy:\n"
        f"    class_path: {class_path}\n"
        "    init_args:\n"
        "      stage: 2\n"
        "      max_out_tokens: 128\n"
        "      release_inference_cache: true\n"
    )
    report = run_cli(f"--config={config}")
    assert report["stage"] == 2
    assert report["hybrid_engine"]["max_out_tokens"] == 128 and report["hybrid_engine"]["release_inference_cache"]

"""The strategy picked from a Lightning CLI run: by name, by class path, from YAML (subprocess, a few steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

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


def run_cli(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *COMMON, *args], env=subprocess_env(), capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("STRATEGY "))
    return json.loads(line.removeprefix("STRATEGY "))


def test_registered_name():
    report = run_cli("--trainer.strategy=hybrid_engine_stage_2")
    assert report["class"] == "HybridEngineStrategy" and report["stage"] == 2
    assert report["engine"] == "HybridEngine" and report["calls"] == 1


def test_class_path_with_init_args():
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
def test_yaml_config(tmp_path, class_path):
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

"""The core names no vendor's model: without ``--device`` a command takes the first installed
device model by name (for ``migrate-demo``, the first with a guest workload)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from distributions import pip_install

from vfio_mediate import RegistryError
from vfio_mediate._entry_points import default_device_model
from vfio_mediate.cli import main

MODELS = Path(__file__).parent / "models"


@pytest.fixture(scope="module")
def first_model_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("models")
    pip_install([MODELS / "aa-first-model"], site, tmp_path_factory.mktemp("sources"))
    return site


def test_the_first_installed_model_by_name_is_the_default(
    first_model_site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert default_device_model() == "i40e-vf"
    monkeypatch.syspath_prepend(str(first_model_site))
    assert default_device_model() == "aa-first"
    assert default_device_model(with_workload=True) == "i40e-vf", "aa-first has no workload"
    assert main(["probe", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["vendor_id"], report["device_id"]) == (0x1AF4, 0x10FF)


def test_no_installed_model_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VFIO_MEDIATE_DISABLE", "i40e-vf")
    with pytest.raises(RegistryError, match="no device model is installed"):
        default_device_model()
    assert main(["migrate-demo"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no device model with a guest workload" in error

"""Unit tests of faasd.config: what a relative path is relative to."""

from __future__ import annotations

from pathlib import Path

from faasd.config import load_config


def _layout(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A config file in etc/ and a current directory elsewhere."""
    etc, cwd = tmp_path / "etc", tmp_path / "work"
    etc.mkdir()
    cwd.mkdir()
    (etc / "faasd.toml").write_text('[paths]\nfunctions = "fns"\n')
    monkeypatch.chdir(cwd)
    return etc, cwd


def test_paths_in_the_file_and_the_defaults_are_relative_to_the_file(tmp_path, monkeypatch):
    etc, _ = _layout(tmp_path, monkeypatch)
    config = load_config(etc / "faasd.toml", env={})
    assert config.paths.functions == etc / "fns"
    assert config.paths.data == etc / ".faasd"


def test_paths_given_by_flags_or_the_environment_are_relative_to_the_current_directory(
        tmp_path, monkeypatch):
    # `faasd serve --functions functions` means ./functions, wherever the config file is.
    etc, cwd = _layout(tmp_path, monkeypatch)
    config = load_config(etc / "faasd.toml", env={"FAASD_PATHS_DATA": "state"},
                         overrides={"paths": {"functions": "functions"}})
    assert config.paths.functions == cwd / "functions"
    assert config.paths.data == cwd / "state"
    absolute = load_config(etc / "faasd.toml", env={},
                           overrides={"paths": {"functions": str(tmp_path / "elsewhere")}})
    assert absolute.paths.functions == tmp_path / "elsewhere"


def test_without_a_file_everything_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, env={})
    assert config.paths.functions == tmp_path / "functions"
    assert config.paths.data == tmp_path / ".faasd"

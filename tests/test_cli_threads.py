"""The command line makes idle OpenMP threads wait passively, unless the user chose otherwise.

Beside another busy process a spinning OpenMP thread takes the core from the thread it waits for;
the setting only works when it is in the environment before torch loads its OpenMP library.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from swav import cli

PROBE = (
    "import os, sys\n"
    "from swav.cli import main\n"
    "main(['--help'])\n"
    "print('torch imported before main:', 'torch' in sys.modules)\n"
    "print('policy:', os.environ.get('OMP_WAIT_POLICY'))\n"
)


def _probe(env_changes: dict[str, str | None]) -> str:
    env = dict(os.environ)
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(key, None)
    for key, value in env_changes.items():
        if value is not None:
            env[key] = value
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_command_line_sets_a_passive_wait_before_torch_loads():
    out = _probe({})
    # Fails if importing the command line imports torch: the setting would come too late.
    assert "torch imported before main: False" in out
    assert "policy: PASSIVE" in out


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}],
                         ids=["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"])
def test_a_wait_policy_the_user_chose_is_kept(user):
    out = _probe(user)
    expected = user.get("OMP_WAIT_POLICY")  # GOMP_SPINCOUNT alone: no policy is added beside it
    assert f"policy: {expected}" in out


def test_importing_the_module_changes_nothing(monkeypatch):
    # A library user who imports swav.cli (to call a command) keeps their process's settings.
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    import importlib

    importlib.reload(cli)
    assert "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.parametrize("command", ["train", "config"])
def test_help_of_each_config_command_prints_the_usage(command, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_wait_passively", lambda: None)  # leave this process's environment alone
    # The usage text holds a literal "%", which argparse would read as a format directive.
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "fine-tune with 1 % / 10 % of the labels" in out and "config=NAME" in out

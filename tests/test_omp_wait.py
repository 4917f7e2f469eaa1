"""The OpenMP wait setting moe_offload picks before torch loads libgomp (moe_offload/__init__.py: omp_wait)."""

from __future__ import annotations

import os
import subprocess
import sys

import moe_offload


def test_a_short_spin_on_a_quiet_machine_and_sleep_at_once_beside_other_work():
    assert moe_offload.omp_wait({}, others_running=0, cpus=2) == {"GOMP_SPINCOUNT": "10000"}
    assert moe_offload.omp_wait({}, others_running=1, cpus=2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert moe_offload.omp_wait({}, others_running=0, cpus=1) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_a_users_setting_wins():
    assert moe_offload.omp_wait({"OMP_WAIT_POLICY": "ACTIVE"}, 0, 2) == {}
    assert moe_offload.omp_wait({"GOMP_SPINCOUNT": "5"}, 3, 2) == {}


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MOE_OFFLOAD_OMP_WAIT")}
    code = ("import os, moe_offload; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), "
            "os.environ.get('MOE_OFFLOAD_OMP_WAIT'), 'torch' in __import__('sys').modules)")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out


def test_the_choice_is_made_at_import_and_a_child_makes_its_own():
    policy, spin, ours, torch_loaded = _child_env()
    assert torch_loaded == "False"  # set before anything loads libgomp
    assert (policy, spin) in (("PASSIVE", "None"), ("None", "10000"))
    assert ours == ("OMP_WAIT_POLICY" if policy == "PASSIVE" else "GOMP_SPINCOUNT")
    # a variable a parent of ours chose (it says so) is chosen again; one the user set is kept
    policy, spin, ours, _ = _child_env(GOMP_SPINCOUNT="123", MOE_OFFLOAD_OMP_WAIT="GOMP_SPINCOUNT")
    assert spin != "123" and ours in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    assert _child_env(GOMP_SPINCOUNT="123")[:3] == ["None", "123", "None"]

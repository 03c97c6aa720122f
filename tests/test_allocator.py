"""pamarl.allocator: freed activations are reused without new page faults (glibc only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pamarl.allocator import keep_freed_memory


def _is_glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError):
        return False


glibc = pytest.mark.skipif(not _is_glibc(),
                           reason="the allocator settings are glibc's (mallopt); other C libraries are left alone")

# A learner's gradient steps (an MLP with LayerNorms on 1,600 rows, forward, backward, Adam), counting
# the page faults of the steps after the first few.
PROBE = """
import resource, torch
from pamarl.allocator import keep_freed_memory
applied = keep_freed_memory()
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(18, 128), torch.nn.ReLU(), torch.nn.LayerNorm(128), torch.nn.Linear(128, 128),
                          torch.nn.ReLU(), torch.nn.LayerNorm(128), torch.nn.Linear(128, 5))
opt = torch.optim.Adam(net.parameters())
x = torch.randn(6400, 18)
def step(i):
    loss = net(x[torch.randperm(6400)[:1600]]).logsumexp(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
for i in range(5):
    step(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    step(i)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(tuning: str) -> tuple[bool, int]:
    env = {**os.environ, "PAMARL_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@glibc
def test_freed_activations_are_reused_without_page_faults() -> None:
    applied, faults = probe("1")
    assert applied
    off, faults_off = probe("0")
    assert not off
    # glibc's defaults hand activations back and fault them in again (measured: about 240 faults per step);
    # with the settings the steps reuse the heap they already have (measured: about 10 per step).
    assert faults_off > 40 * 50
    assert faults * 10 < faults_off


def test_keep_freed_memory_is_idempotent() -> None:
    assert keep_freed_memory() == keep_freed_memory()

"""The pieces of multi-process runs (SDMOrganSegLib.engines.distributed): ranks from torchrun's variables, sharing
cases and batches out, the sampler's shards, and the loss weighting under DistributedDataParallel with a
real two-process gloo group (torchrun).

The whole runs (``torchrun ... sdmorganseg train`` and ``torchrun ... batch.py``) are in
test_distributed_training.py and test_distributed_batch.py.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest
from conftest import HIPPOCAMPUS, REPO, needs_torch, single_threaded_environment, torchrun

from SDMOrganSegLib.engines import distributed
from SDMOrganSegLib.common.errors import SDMOrganSegError


def test_ranks_come_from_torchruns_variables():
    assert distributed.from_environment({}) == distributed.SINGLE and not distributed.SINGLE.distributed
    ranks = distributed.from_environment({"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"})
    assert ranks == distributed.Ranks(3, 16, 3, 8) and ranks.shard == (3, 16) and not ranks.main
    assert distributed.from_environment({"RANK": "0", "WORLD_SIZE": "1"}) == distributed.SINGLE  # torchrun with one process: as without
    assert distributed.from_environment({"WORLD_SIZE": "1"}) == distributed.SINGLE
    for broken in ({"WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(SDMOrganSegError, match="torchrun") as caught:
            distributed.from_environment(broken)
        assert "\n" not in str(caught.value)


def test_the_default_memory_budget_is_shared_by_the_processes_of_a_machine(monkeypatch):
    assert [distributed.processes_on_this_machine(e) for e in ({}, {"LOCAL_WORLD_SIZE": "8"}, {"LOCAL_WORLD_SIZE": "x"})] == [1, 8, 1]
    needs_torch()
    from SDMOrganSegLib.engines.inference import MEMORY_ENV, memory_budget_bytes

    monkeypatch.delenv(MEMORY_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = memory_budget_bytes()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert memory_budget_bytes() == pytest.approx(alone / 4, rel=0.2)  # available memory moves a little meanwhile
    assert memory_budget_bytes(3.0) == 3e9  # a given budget is each process's
    monkeypatch.setenv(MEMORY_ENV, "5")
    assert memory_budget_bytes() == 5e9


def test_timeout_is_minutes_from_the_environment():
    assert distributed.timeout_minutes({}) == distributed.DEFAULT_TIMEOUT_MINUTES
    assert distributed.timeout_minutes({distributed.TIMEOUT_ENV: "90"}) == 90
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(SDMOrganSegError, match=distributed.TIMEOUT_ENV):
            distributed.timeout_minutes({distributed.TIMEOUT_ENV: bad})


@pytest.mark.parametrize("count, world", [(8, 2), (2, 2), (1, 2), (5, 2), (7, 3), (16, 8)])
def test_batch_slices_tile_the_batch(count, world):
    slices = [distributed.batch_slice(count, rank, world) for rank in range(world)]
    assert slices[0][0] == 0 and slices[-1][1] == count
    assert all(slices[r][1] == slices[r + 1][0] for r in range(world - 1))  # contiguous, in rank order
    sizes = [stop - start for start, stop in slices]
    assert max(sizes) - min(sizes) <= 1
    if count % world == 0:
        assert sizes == [count // world] * world


def test_cases_are_dealt_once_each_and_evenly_by_size():
    rng = np.random.default_rng(0)
    sizes = rng.lognormal(16, 1, size=101).tolist()  # file sizes over two orders of magnitude
    for world in (1, 2, 3, 8):
        shares = distributed.shard(sizes, world)
        assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
        assert all(share == sorted(share) for share in shares)
        totals = [sum(sizes[i] for i in share) for share in shares]
        # Largest first to the emptiest rank: no rank ends more than one item above another.
        assert max(totals) - min(totals) <= max(sizes)
        assert distributed.shard(sizes, world) == shares  # every rank computes the same deal
    assert distributed.shard([0, 0, 0], 2) == [[0, 2], [1]]  # ties (e.g. unreadable inputs): fewer items, then the lower rank


@pytest.mark.parametrize("batch, world", [(2, 2), (4, 2), (4, 4)])
def test_the_ranks_slices_are_exactly_the_single_process_batch(tmp_path, batch, world):
    """Every batch of every epoch: the ranks' patches, concatenated in rank order, are bit for bit the batch
    one process draws from the same (seed, epoch) generator (foreground centring and flips included), also
    in the short last batch where a rank gets no patch."""
    needs_torch()
    import torch

    from SDMOrganSegLib.formats.dataset import find_cases, load_cases
    from SDMOrganSegLib.engines.training import PatchSampler

    cases = load_cases(find_cases(HIPPOCAMPUS)[:5], [1, 2], {"method": "percentile", "lower": 0.5, "upper": 99.5}, None, tmp_path)
    sampler = PatchSampler(cases, [1, 2], (24, 32, 24), flip=True, foreground_fraction=0.5)
    for epoch in (1, 2):
        whole = list(sampler.batches(batch, np.random.default_rng([0, epoch])))
        shards = [list(sampler.batches(batch, np.random.default_rng([0, epoch]), (rank, world))) for rank in range(world)]
        assert all(len(shard) == len(whole) == -(-5 // batch) for shard in shards)  # the same number of steps
        for step, expected in enumerate(whole):
            for part, tensor in enumerate(expected):
                pieces = [shard[step][part] for shard in shards]
                assert [p.shape[0] for p in pieces] == [b - a for a, b in (distributed.batch_slice(len(tensor), r, world) for r in range(world))]
                assert torch.equal(torch.cat(pieces), tensor)


_WEIGHTING = """
import copy, json, sys
import torch
sys.path.insert(0, {library!r})
from SDMOrganSegLib.engines import distributed

with distributed.process_group("gloo") as ranks:
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    # The one-process reference on a copy: a backward through the wrapped module's own parameters would fire
    # DistributedDataParallel's gradient hooks on one rank only (an all-reduce the other rank never joins).
    single = copy.deepcopy(network)
    inputs, targets = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    model = distributed.data_parallel(network, ranks, torch.device("cpu"))
    report = {{}}
    for total in (3, 2, 1):  # 3 patches over 2 ranks: 1 + 2; 2: 1 + 1; 1: none on rank 0
        start, stop = distributed.batch_slice(total, ranks.rank, ranks.world_size)
        output = model(inputs[start:stop])
        loss = ((output - targets[start:stop]) ** 2).mean()
        loss, values = distributed.global_batch_mean(ranks, loss, {{"loss": float(loss.detach())}}, output, total)
        network.zero_grad()
        loss.backward()
        gradient = torch.cat([p.grad.reshape(-1) for p in network.parameters()])
        single.zero_grad()
        expected_loss = ((single(inputs[:total]) - targets[:total]) ** 2).mean()  # one process, the whole batch
        expected_loss.backward()
        expected = torch.cat([p.grad.reshape(-1) for p in single.parameters()])
        report[total] = [float((gradient - expected).abs().max() / expected.abs().max()), abs(values["loss"] - float(expected_loss)) / float(expected_loss)]
    with open({out!r} + f"/rank{{ranks.rank}}.json", "w") as handle:
        json.dump(report, handle)
"""


def test_weighted_rank_losses_give_the_gradient_of_the_global_batch_mean(tmp_path):
    """Two gloo processes under torchrun, DistributedDataParallel, float64: for global batches that the two
    ranks share evenly, unevenly (1 + 2) and not at all (rank 0 empty), the averaged gradient and the
    reduced loss are those of the mean over the global batch, to float64 rounding (a few units of 2^-52 on
    sums of 3 terms; a wrong weight is off by 1/3 and more)."""
    needs_torch()
    script = tmp_path / "weighting.py"
    script.write_text(textwrap.dedent(_WEIGHTING.format(library=str(REPO / "SDMOrganSeg"), out=str(tmp_path))), encoding="utf-8")
    done = subprocess.run(torchrun(2) + [str(script)], capture_output=True, text=True, timeout=300, env=single_threaded_environment())
    assert done.returncode == 0, done.stdout + done.stderr
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for total, (gradient_error, loss_error) in report.items():
            assert gradient_error < 1e-14 and loss_error < 1e-14, (rank, total, gradient_error, loss_error)

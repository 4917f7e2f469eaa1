"""NUMA detection on a fake sysfs tree, expert placement, and libnuma allocation where the library exists."""

import gc

import pytest

from moe_offload import numa


def fake_sysfs(root, nodes, gpu=None, gpu_node=None):
    """nodes: [(cpulist, MemTotal kB, MemFree kB, distance row)]"""
    base = root / "sys/devices/system/node"
    for i, (cpus, total, free, dist) in enumerate(nodes):
        d = base / f"node{i}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(f"Node {i} MemTotal:       {total} kB\nNode {i} MemFree:        {free} kB\n"
                                   f"Node {i} MemUsed:        {total - free} kB\n")
        (d / "distance").write_text(" ".join(map(str, dist)) + "\n")
    (base / "online").write_text(f"0-{len(nodes) - 1}\n")  # a file beside the node folders, ignored
    if gpu:
        p = root / "sys/bus/pci/devices" / gpu
        p.mkdir(parents=True)
        (p / "numa_node").write_text(f"{gpu_node}\n")
    return root


def test_parse_cpulist():
    assert numa.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert numa.parse_cpulist("") == []


def test_two_nodes_gpu_local_node_gets_the_hottest_experts(tmp_path):
    root = fake_sysfs(tmp_path, [("0-3", 16 * 2**20, 8 * 2**20, (10, 21)), ("4-7", 16 * 2**20, 12 * 2**20, (21, 10))],
                      gpu="0000:65:00.0", gpu_node=1)
    nodes = numa.detect(root)
    assert [(n.id, n.cpus, n.mem_total, n.mem_free) for n in nodes] == [
        (0, (0, 1, 2, 3), 16 * 2**30, 8 * 2**30), (1, (4, 5, 6, 7), 16 * 2**30, 12 * 2**30)]
    assert numa.pci_numa_node("0000:65:00.0", root) == 1
    assert numa.local_node(root, gpu="0000:65:00.0") == 1
    assert numa.local_node(root, cpus={0, 1}) == 0  # no GPU: the node of the compute threads
    # 2 layers x 4 experts of 100 bytes; node 1 holds 3, node 0 holds 4: the 7 hottest are placed, the coldest not
    stats = {0: [0.9, 0.1, 0.5, 0.05], 1: [0.2, 0.8, 0.3, 0.4]}
    p = numa.place_experts(stats, 100, {0: 400, 1: 300}, local=1, nodes=nodes)
    assert not p.noop
    assert {k for k, n in p.node_of.items() if n == 1} == {(0, 0), (1, 1), (0, 2)}  # 0.9, 0.8, 0.5
    assert {k for k, n in p.node_of.items() if n == 0} == {(1, 3), (1, 2), (1, 0), (0, 1)}  # 0.4, 0.3, 0.2, 0.1
    assert (0, 3) not in p.node_of and p.bytes_on == {1: 300, 0: 400}
    assert "node 1" in p.report()


def test_routing_stats_json_form_and_mixed_sizes(tmp_path):
    stats = {"format": "moe-offload-routing-stats", "layers": {"3": {"frequency": [0.1, 0.7]},
                                                                "5": {"frequency": [0.6, 0.2]}}}
    sizes = {(3, 0): 50, (3, 1): 200, (5, 0): 200, (5, 1): 50}
    p = numa.place_experts(stats, sizes, {0: 250, 1: 1000}, local=0)
    # (3,1) 200 B on node 0; (5,0) 200 B does not fit the remaining 50 -> node 1; (5,1) 50 B fits node 0
    assert p.node_of == {(3, 1): 0, (5, 0): 1, (5, 1): 0, (3, 0): 1}


def test_single_node_is_a_noop(tmp_path):
    root = fake_sysfs(tmp_path, [("0-1", 8 * 2**20, 4 * 2**20, (10,))])
    nodes = numa.detect(root)
    assert len(nodes) == 1 and numa.local_node(root, gpu="0000:01:00.0") == 0  # unknown GPU -> compute node
    p = numa.place_experts({0: [1.0, 0.5]}, 100, {0: 10**9}, local=0, nodes=nodes)
    assert p.noop and p.node_of == {} and "no-op" in p.report()


def test_gpu_with_unknown_node(tmp_path):
    root = fake_sysfs(tmp_path, [("0-1", 1, 1, (10, 20)), ("2-3", 1, 1, (20, 10))], gpu="0000:01:00.0", gpu_node=-1)
    assert numa.pci_numa_node("0000:01:00.0", root) is None
    assert numa.local_node(root, gpu="0000:01:00.0", cpus={2, 3}) == 1


@pytest.mark.skipif(not numa.numa_available()[0], reason="libnuma not available here")
def test_alloc_on_node_binds_and_frees(monkeypatch):
    freed = []
    real = numa._free
    monkeypatch.setattr(numa, "_free", lambda ptr, n: (freed.append(n), real(ptr, n)))
    t = numa.alloc_on_node(3 * 4096 + 5, 0)
    assert t.numel() == 3 * 4096 + 5 and t.data_ptr() % 4096 == 0
    t.fill_(7)
    assert int(t.sum()) == 7 * t.numel()
    assert numa.node_of_address(t.data_ptr()) == 0
    view = t[10:12]
    del t
    gc.collect()
    assert view.tolist() == [7, 7] and freed == []  # the view keeps the buffer alive
    del view
    gc.collect()
    assert freed == [3 * 4096 + 5]

"""Print a host's datapath counters read from its pins (works with its agent dead):
python pinned_counters.py BPFFS_DIR [NETNS] -> "direction verdict reason: packets; ...",
then one line per endpoints entry (the interface's name from NETNS, its identity, flags)."""
import os
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "../../tests"), os.path.join(HERE, "../../agent")]

from pinned import dump_map, per_cpu  # noqa: E402
from stockade.datapath import maps as m  # noqa: E402
from stockade.datapath.pins import pin_name  # noqa: E402

counts = dump_map(os.path.join(sys.argv[1], pin_name("counters")))
out = []
for key, value in sorted(counts.items()):
    index = struct.unpack("<I", key[:4])[0]
    packets = sum(struct.unpack("<Q", v[:8])[0] for v in per_cpu(value, 16))
    if packets:
        head, reason = divmod(index, m.NUM_REASONS)
        direction, verdict = divmod(head, m.NUM_VERDICTS)
        out.append(f"{'egress' if direction == m.DIR_EGRESS else 'ingress'} "
                   f"{m.Verdict(verdict).name} {m.Reason(reason).name.lower()}: {packets}")
print("; ".join(out))

names = {}
if len(sys.argv) > 2:
    ip = subprocess.run(["ip", "-n", sys.argv[2], "-o", "link", "show"], capture_output=True, text=True)
    for line in ip.stdout.splitlines():
        index, name = line.split(":")[:2]
        names[int(index)] = name.strip().split("@")[0]
for key, value in sorted(dump_map(os.path.join(sys.argv[1], pin_name("endpoints"))).items()):
    ifindex = struct.unpack("<I", key[:4])[0]
    endpoint_id, identity, flags = struct.unpack("<III", value[:12])
    print(f"endpoint {names.get(ifindex, ifindex)}: id {endpoint_id} identity {identity} flags {flags:#x}")

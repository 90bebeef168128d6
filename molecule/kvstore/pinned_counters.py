"""Print a host's datapath counters read from its pins (works with its agent dead):
python pinned_counters.py BPFFS_DIR -> one line, "direction verdict reason: packets"."""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "../../tests"), os.path.join(HERE, "../../agent")]

from pinned import dump_map  # noqa: E402
from stockade.datapath import maps as m  # noqa: E402
from stockade.datapath.pins import pin_name  # noqa: E402

counts = dump_map(os.path.join(sys.argv[1], pin_name("counters")))
out = []
for key, value in sorted(counts.items()):
    index = struct.unpack("<I", key[:4])[0]
    packets = struct.unpack("<Q", value[:8])[0]
    if packets:
        head, reason = divmod(index, m.NUM_REASONS)
        direction, verdict = divmod(head, m.NUM_VERDICTS)
        out.append(f"{'egress' if direction == m.DIR_EGRESS else 'ingress'} "
                   f"{m.Verdict(verdict).name} {m.Reason(reason).name.lower()}: {packets}")
print("; ".join(out))

"""Validate a stockade_services mapping (JSON file) with the agent's own parser.

Run on the controller by the stockade_policy role; prints `stockade_services.<field path>:
<problem>` and exits 1 on the first error.
"""
import json
import sys

from stockade.daemon.inventory import parse_services
from stockade.errors import InvalidRequest

try:
    with open(sys.argv[1]) as f:
        parse_services(json.load(f))
except InvalidRequest as exc:
    where = "stockade_" + exc.field if exc.field and exc.field.startswith("services") else exc.field
    print("%s: %s" % (where or "stockade_services", exc))
    sys.exit(1)

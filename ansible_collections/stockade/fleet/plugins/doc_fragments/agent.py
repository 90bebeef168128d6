# -*- coding: utf-8 -*-
# Copyright: Stockade contributors
# SPDX-License-Identifier: Apache-2.0 OR GPL-3.0-or-later
# Apache License 2.0, or (at your option) the GNU General Public License v3.0+
# (see https://www.apache.org/licenses/LICENSE-2.0 and https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every Stockade module shares: the agent's API socket and the check and diff modes."""
from __future__ import annotations


class ModuleDocFragment:

    # A module that changes the agent: check mode and diff mode.
    DOCUMENTATION = r"""
options:
  socket:
    description:
      - Path of the agent's API socket on the managed host.
      - Changes need root on the managed host (the agent allows only root to change its
        state); reads work for members of the socket's group.
    type: path
    default: /run/stockade/agent.sock
attributes:
  check_mode:
    description:
      - Asks the agent for a dry run and reports what would change, changing nothing.
    support: full
  diff_mode:
    description:
      - Shows what changes on the agent, in the agent's own words.
    support: full
notes:
  - Talks to the Stockade agent over its unix socket with the Python standard library
    only; fails when the agent cannot be reached, naming the socket it tried.
"""

    # A read-only module: check mode changes nothing anyway, there is no diff.
    READ_ONLY = r"""
options:
  socket:
    description:
      - Path of the agent's API socket on the managed host.
      - Members of the socket's group may read; root is not needed.
    type: path
    default: /run/stockade/agent.sock
attributes:
  check_mode:
    description:
      - Read-only, so it runs the same in check mode.
    support: full
  diff_mode:
    description:
      - Read-only, so there is no difference to show.
    support: none
notes:
  - Talks to the Stockade agent over its unix socket with the Python standard library
    only; fails when the agent cannot be reached, naming the socket it tried.
"""

# -*- coding: utf-8 -*-
# Copyright: Stockade contributors; Apache-2.0
"""Run tasks inside a network namespace of this machine (Molecule's simulated hosts)."""
from __future__ import annotations

DOCUMENTATION = r"""
name: stockade_netns
short_description: Run commands on this machine inside a network namespace
description:
  - The local connection, with every command run through C(ip netns exec NAME), where
    NAME is the host's C(ansible_host). Files are shared with the controller (only
    /etc/netns/NAME overlays /etc); /sys is the namespace's, so bpffs must live elsewhere.
  - Used by Stockade's Molecule scenario to simulate several hosts on one machine.
author: Stockade contributors
extends_documentation_fragment: []
options: {}
"""

import shlex

from ansible.plugins.connection.local import Connection as LocalConnection


class Connection(LocalConnection):
    transport = "stockade_netns"

    def exec_command(self, cmd, in_data=None, sudoable=True):
        netns = self._play_context.remote_addr
        wrapped = "ip netns exec %s /bin/sh -c %s" % (shlex.quote(netns), shlex.quote(cmd))
        return super().exec_command(wrapped, in_data=in_data, sudoable=sudoable)

"""A MapWriter over dicts that hold the policy maps' raw keys and values, as the kernel
would (generation bits included), for the writer's ordering tests: ``view()`` is what
the programs see (bpf/lib/policy.h: each pair's flags entry and the entries of the
generation it names), ``after_write`` runs after every single map write."""
from __future__ import annotations

from stockade.datapath import maps as m
from stockade.datapath.errors import DatapathError
from stockade.datapath.writer import MapWriter, _gen_of, _key_from_c, _policy_key
from stockade.policy.mapstate import DirectionPolicy, Entry, FlagState, MapState

TYPES = {"policy": (m.PolicyKey, m.PolicyValue),
         "policy_flags": (m.PolicyFlagsKey, m.PolicyFlagsValue)}


class RawMapWriter(MapWriter):
    def __init__(self, entries: MapState | None = None, flags: FlagState | None = None,
                 limit: int = 1 << 20, flags_limit: int = 1 << 20, switch_min: int | None = None):
        self.maps: dict[str, dict[bytes, bytes]] = {"policy": {}, "policy_flags": {}}
        self.limits = {"policy": limit, "policy_flags": flags_limit}
        if switch_min is not None:
            self.switch_min = switch_min
        for k, e in (entries or {}).items():
            self.maps["policy"][bytes(_policy_key(k))] = bytes(m.PolicyValue(deny=int(e.deny)))
        for (ident, d), f in (flags or {}).items():
            if f != DirectionPolicy():
                self.maps["policy_flags"][bytes(m.PolicyFlagsKey(identity=ident, direction=d))] = \
                    bytes(m.PolicyFlagsValue(enforced=int(f.enforced), default_deny=int(f.default_deny)))
        self.writes = 0
        self.events: list[tuple] = []     # ("update" | "delete", map, key bytes), ("grace",)
        self.fail_at: int | None = None   # raise at this write (0-based), before doing it

    def max_entries(self, name):
        return self.limits[name]

    def _items(self, name, key_type, value_type):
        return [(key_type.from_buffer_copy(k), value_type.from_buffer_copy(v))
                for k, v in self.maps[name].items()]

    def _count(self, name):
        if self.fail_at is not None and self.writes == self.fail_at:
            raise DatapathError(name, "injected failure")
        self.writes += 1

    def _update(self, name, key, value):
        self._count(name)
        raw = bytes(key)
        if raw not in self.maps[name] and len(self.maps[name]) >= self.limits[name]:
            raise DatapathError(name, "update failed: E2BIG (map full)")
        self.maps[name][raw] = bytes(value)
        self.events.append(("update", name, raw))
        self.after_write()

    def _delete(self, name, key):
        self._count(name)
        found = self.maps[name].pop(bytes(key), None) is not None
        self.events.append(("delete", name, bytes(key)))
        self.after_write()
        return found

    def _update_raw(self, name, keys, values, n):
        ks, vs = len(keys) // n, len(values) // n
        for i in range(n):
            self._update(name, keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs])

    def after_write(self) -> None:
        pass

    def _wait_for_programs(self) -> None:
        self.events.append(("grace",))

    def view(self) -> tuple[MapState, FlagState]:
        """(entries, flags) the programs decide by now."""
        gens, flags = {}, {}
        for k, v in self._items("policy_flags", *TYPES["policy_flags"]):
            gens[(k.identity, k.direction)] = v.gen
            f = DirectionPolicy(bool(v.enforced), bool(v.default_deny))
            if f != DirectionPolicy():
                flags[(k.identity, k.direction)] = f
        entries = {}
        for k, v in self._items("policy", *TYPES["policy"]):
            key = _key_from_c(k)
            if _gen_of(k) == gens.get((key.local, key.direction), 0):
                entries[key] = Entry(bool(v.deny))
        return entries, flags

    def raw_generations(self) -> set[tuple[int, int, int]]:
        """(local, direction, generation) of every policy entry in the map."""
        return {(k.local, k.direction & ~m.POLICY_DIR_GEN, _gen_of(k))
                for k, _ in self._items("policy", *TYPES["policy"])}

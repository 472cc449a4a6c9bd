"""Code the tests hand to Ray processes by name (reward workers, co-located roles): keep its imports light."""

import gc

# whether this module was imported with the garbage collector on (a co-located role's host and the `aapo` script
# import role classes and command runners without it: aapo_ray.import_gc)
IMPORTED_WITH_GC = gc.isenabled()


def text_hash_reward(completion: str, gold: str) -> float:  # noqa: ARG001 - the reward-function signature
    """0 or 1 from the completion's characters: varies with every sampled token, so runs whose samples differ
    anywhere log different rewards (the tiny test model is too weak for accuracy to vary)."""
    return float(sum(map(ord, completion)) % 2)


class Echo:
    """A role class for co-location tests: echoes with a prefix, returns pairs, raises on demand."""

    def __init__(self, prefix: str):
        if prefix == "boom":
            raise ValueError("boom at start")
        self.prefix = prefix

    def ready(self) -> str:
        return self.prefix

    def pair(self, value: str) -> tuple[str, int]:
        return self.prefix + value, len(value)

    def fail(self):
        raise KeyError("no such thing")

    def gc_state(self) -> dict:
        """This process's garbage collector: on at the import of this module, on now, anything frozen."""
        return {"imported_with_gc": IMPORTED_WITH_GC, "on": gc.isenabled(), "frozen": gc.get_freeze_count() > 0}

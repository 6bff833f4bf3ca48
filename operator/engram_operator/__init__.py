"""The Engram Stream operator: an ``EngramCluster`` resource kept true by kopf handlers.

``kopf run -m engram_operator`` imports this package, which registers the handlers of
:mod:`engram_operator.handlers`. The modules, from the resource inwards:

* :mod:`.spec` - the resource's spec as a frozen dataclass (and what the schema cannot check);
* :mod:`.observe` - what the cluster looks like now: pods, the StatefulSet, Redis heartbeats,
  the shards' Stats;
* :mod:`.decide` - pure decisions: shard health, stuck pods, scaling steps, conditions;
* :mod:`.act` - carrying them out: pod deletions, replicas, moves, Events, status;
* :mod:`.kube` - the small Kubernetes API client the acting side uses.
"""

from engram_operator import handlers as handlers

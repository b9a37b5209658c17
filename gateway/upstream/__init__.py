"""The upstream side: connections to the engine replicas, their health, and the choice of replica.

Owns ``transport`` and ``connection`` (the HTTP/1.1 client), ``sender`` (one replica's client and the headers it
gets), ``replicas`` (the replica set and health checks), ``ranking`` (scoring candidates) and ``router``
(planning against every replica and choosing one). May import the base modules, ``wire`` and ``planning``.
"""

__all__: list[str] = []

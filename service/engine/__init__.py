"""The engine role: what owns a device's model (batcher, runtime instances, runtime health).

`core.Engine` runs in the process that serves HTTP (`--engine inline`) or in an engine process
of its own (`--engine process`, `service.engine.process`), reached from the front ends over the
corridor (`service.engine.client`). Either way front ends see one interface (`EngineClient`).
"""

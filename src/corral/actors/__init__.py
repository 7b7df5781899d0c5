"""The actor kernel and supervision: mailbox, ref, system, context, actor, supervisor.

Nothing here knows of models, engines, transports or the serving pipeline; the serving
actors are in `corral.runtime`.
"""

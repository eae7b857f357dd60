"""Workers: ready studies -> jobs -> model results, on one machine or many GPU nodes.

Modules, in data-flow order:

- ``scheduler``: the ``scheduler`` role. Plans ready studies into jobs keyed by
  ``sha256(study UID index | series-set hash | EHR snapshot hash | model version)``; waits for
  required EHR fields up to ``workers.ehr_deadline_seconds``; supersedes older jobs of a study whose
  content changed; commits each job before sending its task, and reconciles (re-sends unpublished
  jobs, re-queues jobs of lost workers, re-sends lost hand-offs). ``scheduler.hook`` is the
  listener's readiness hook (``Tracker.add_hook``) for an immediate wake-up in ``serve all``.
- ``celery_app``: the Celery app built from Settings; queues ``gpu`` and ``publish``; the embedded
  SQLite transport when no broker URL is set.
- ``tasks``: the ``msgate.infer`` shell; ``worker``: the ``worker`` role (solo pool, one process
  per GPU); ``runtime``: the per-process model and device.
- ``inference``: claim, dynamic batching, predict, store, hand-off; ``jobs``: job rows and leases.
- ``case``, ``volume``, ``ehr``: case loading (in-memory decryption, audited), volume assembly,
  order/patient linking and the EHR snapshot; ``results_io``: the encrypted result, one per job.

Job states: ``queued -> running -> done | failed``, plus ``superseded`` and ``cancelled``.
``Job.stages`` holds timings in ms (queue_wait, load, decode, transforms, inference, store,
ready_to_result) and the batch size; ``Job.error`` a readable reason; ``Job.flags`` the series used
(role -> series id), the EHR gaps, ``flair_instances`` (instance id per FLAIR slice ``k``; None where
the slice was interpolated), ``flair_frames`` (per slice ``k``, the 0-based frame of a multi-frame
instance, else None; the results side renders the SEG, map and key images on exactly these source
frames) and ``handoff_at``.
"""

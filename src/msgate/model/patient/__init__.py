"""Patient-level multimodal model: EDSS class and estimate, MS vs cSVD, Rim+ count.

Modules: ``presets`` (sizes), ``ehr`` (schema encoding and hash), ``preprocess`` (MONAI resampling to
the model grid and back), ``lesionsrc`` (lesion model adapter + lesion features), ``encoders`` (study
and HE-compatible EHR encoders), ``fusion`` (image-conditioned gate, linear in the EHR embedding),
``network``, ``calibration``, ``explain``, ``checkpoint``, ``synthdata``, ``train``, ``evaluate``,
``baselines``. The worker entry point is :func:`msgate.model.predict.predict`.
"""

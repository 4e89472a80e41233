"""Model zoos built from what ships in packages: real pretrained weights, real task data.

Layers, lowest first: the zoos' data, models and builders (``text_*``, ``vision_*``, ``build``,
``vision_zoo``, and :mod:`mergeflow.clip.zoo`) implement :mod:`~mergeflow.zoo.evaluation`'s protocol;
:mod:`~mergeflow.zoo.registry` names them; :mod:`~mergeflow.zoo.evalcache` caches evaluations;
:mod:`~mergeflow.zoo.selection` chooses parameters on validation and :mod:`~mergeflow.zoo.adapt`
runs AdaMerging; :mod:`~mergeflow.zoo.report` and :mod:`~mergeflow.zoo.plots` present the results;
:mod:`~mergeflow.zoo.job` runs the whole job without Prefect.
"""

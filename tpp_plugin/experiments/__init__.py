"""The harness that exercises the library, kept apart from it.

The library (the neuron's math, the framework adapters, conversion, calibration, count domain,
statistics) is the rest of :mod:`tpp_plugin`; this folder holds what runs it:

* the demo (:mod:`~tpp_plugin.experiments.demo`) and the paper's experiment
  (:mod:`~tpp_plugin.experiments.reproduce`, with
  :mod:`~tpp_plugin.experiments.reproduce_calibration` for threshold calibrations side by side;
  both build and run their networks with :mod:`~tpp_plugin.experiments.variants` and print and
  plot with :mod:`~tpp_plugin.experiments.report`);
* the benchmarks (:mod:`~tpp_plugin.experiments.bench`,
  :mod:`~tpp_plugin.experiments.calibration_bench`,
  :mod:`~tpp_plugin.experiments.calibration_timing`);
* the reference models (:mod:`~tpp_plugin.experiments.models`) and offline data
  (:mod:`~tpp_plugin.experiments.data`).

``python -m tpp_plugin demo|reproduce|bench`` runs the first three (the CLI imports them only when
asked); the calibration benchmarks run as modules, e.g.
``python -m tpp_plugin.experiments.calibration_timing``. The library does not import from here.
"""

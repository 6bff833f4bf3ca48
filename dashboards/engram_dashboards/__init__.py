"""Engram Stream's Grafana dashboards and Prometheus alerts, as code.

Modules (run with ``dashboards/`` on ``PYTHONPATH``, as the make targets do):

* :mod:`.panels`: the shared pieces every dashboard uses (the datasource and instance
  variables, a time-series panel with its unit and legend, the job selectors);
* :mod:`.overview`, :mod:`.shard`, :mod:`.moves`: one dashboard each;
* :mod:`.build`: compiles them to ``dashboards/*.json`` and copies ``dashboards/alerts.yaml``
  into the Helm chart (``python -m engram_dashboards.build [--check]``);
* :mod:`.promql`: the metric names a PromQL expression reads (the tests check them against
  a live ``/metrics``);
* :mod:`.prometheus`: a real Prometheus process scraping a local cluster (tests,
  ``make observe`` and the plots);
* :mod:`.observe`: ``make observe``; :mod:`.plot`: the panels' queries plotted to PNG.
"""

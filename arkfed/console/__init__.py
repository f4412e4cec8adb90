"""``arkfed console``: web pages for the people who run a federation.

- the **coordinator view** (:mod:`arkfed.console.run_view`) shows a run folder, live or finished:
  sites and their states, progress, validation AUC charts, skips and refusals, throughput, files;
- the **site view** (:mod:`arkfed.console.site_view`) is served by a site's own process: the runs
  waiting for approval (Approve / Refuse), the site's policy, and every message that left the site.

:mod:`arkfed.console.app` is the starlette application (Jinja2 templates, a JSON endpoint per view,
the vendored uPlot under ``static/vendor``), :mod:`arkfed.console.security` its login, CSRF and
header rules, :mod:`arkfed.console.serve` the uvicorn server. Layered just below ``arkfed.cli``: it
reads what the federation and run layers write, and nothing but the command line imports it.
"""

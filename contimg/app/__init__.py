"""The operator app: Panel pages and the REST API in one Tornado server, with accounts.

* :mod:`contimg.app.accounts` — users, roles, API tokens, login throttling
* :mod:`contimg.app.queries`  — what the pages and the API read from the state database
* :mod:`contimg.app.api`      — the REST handlers and their OpenAPI document
* :mod:`contimg.app.pages`    — the Panel pages; :mod:`contimg.app.cluster` the Dask view
* :mod:`contimg.app.products` — thumbnails/QA at registration, safe paths, caltable reads
* :mod:`contimg.app.server`   — the server (login, cookies, XSRF) and ``serve``
* :mod:`contimg.app.cli`      — ``contimg app``, ``contimg users``, ``contimg demo --app``
"""

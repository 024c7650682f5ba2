"""``deeplab serve``: the model behind an HTTP API and a browser page (needs ``pip install 'deeplab[serve]'``).

:func:`create_app` builds the Starlette application for one prepared model
(:func:`deeplab.engine.segment.load_bundle`); :mod:`deeplab.serve.batching` holds the request
queue and its inference workers, :mod:`deeplab.serve.codec` the decoding of uploads and the
encoding of the answers. The routes and options are described on the documentation's page
"The HTTP service".
"""

from __future__ import annotations

from deeplab.serve.app import OPTIONS, OUTPUTS, ServeConfig, create_app

__all__ = ["OPTIONS", "OUTPUTS", "ServeConfig", "create_app"]

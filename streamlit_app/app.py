"""The app's launcher: `streamlit run streamlit_app/app.py` serves Home.py and its pages/ exactly as
`streamlit run streamlit_app/Home.py` would, with the front-end middleware of ``frontend`` in front (pages
opened at their own address connect at once; front-end files answered in one write) and TCP_NODELAY on from
the first connection. Starting Home.py directly still works, only slower to open a page in a new tab."""
from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

from frontend import FrontEndMiddleware, enable_tcp_nodelay, page_url_names

HERE = Path(__file__).resolve().parent

enable_tcp_nodelay()

app = st.App(str(HERE / "Home.py"),
             middleware=[Middleware(FrontEndMiddleware, pages=page_url_names(HERE / "pages"))])

"""The web layer: the Flask app (app.create_app), its blueprints (api, ops, cds_hooks, pacs_trigger and
worklist, whose pages are the worklist and a study's), the Flask-side context helpers (web_context) and the
ServiceContext they share with the worker (context, no Flask). Templates and static files stay in
cds_service/templates and cds_service/static."""

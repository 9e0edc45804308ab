"""What runs the engine for people: the job runner, the service the tab and the API share, the
HTTP API, the command line, the demo, the bench and the card-size presets. Imports the engine
and below, and the host seam."""

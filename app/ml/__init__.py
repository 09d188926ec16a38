"""Everything about images, cells and networks. No HTTP here: `app.api` maps these errors to status codes."""

"""Named model presets (`<name>.yaml`), shipped as package data so names resolve in an installed wheel."""

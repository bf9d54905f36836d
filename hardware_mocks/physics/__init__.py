"""Physics the simulators measure: materials, electrolyte conductivity, cells."""

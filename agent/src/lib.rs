//! CP-IS Edge tablet agent. Not built yet: see the "Tablet agent" issue.

//! CP-IS Edge field tests. Not built yet: see the "Field tests" issue.

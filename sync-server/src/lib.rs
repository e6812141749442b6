//! CP-IS Edge central sync server.

-- Migration 3. The live feed: every committed change that can move a region's head notifies
-- the `cpis_heads` channel, so each replica re-reads the heads at once and answers its
-- waiting tablets (a hint only: replicas re-read on a timer too, and the head is the truth).
-- PostgreSQL delivers a notification at commit, once per transaction.
CREATE FUNCTION heads_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cpis_heads', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER head_version_moved AFTER UPDATE ON meta FOR EACH ROW
    WHEN (NEW.key = 'head_version') EXECUTE FUNCTION heads_changed();
CREATE TRIGGER regions_changed AFTER INSERT OR UPDATE OR DELETE ON regions
    FOR EACH STATEMENT EXECUTE FUNCTION heads_changed();
CREATE TRIGGER region_neighbours_changed AFTER INSERT OR UPDATE OR DELETE ON region_neighbours
    FOR EACH STATEMENT EXECUTE FUNCTION heads_changed();
CREATE TRIGGER councils_changed AFTER INSERT OR UPDATE OR DELETE ON councils
    FOR EACH STATEMENT EXECUTE FUNCTION heads_changed();

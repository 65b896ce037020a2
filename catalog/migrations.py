"""Schema versions, kept in SQLite's `PRAGMA user_version`.

Each entry upgrades the database from version N-1 to N with frozen SQL: never edit a released step,
append a new one. The SQL must agree with catalog/schema.py (a test creates both and compares them).
"""

MIGRATIONS: list[str] = [
    # 1: the catalog, custom models, jobs and the event log.
    """
    CREATE TABLE community_model (
        repo_id VARCHAR NOT NULL PRIMARY KEY,
        name VARCHAR NOT NULL,
        link VARCHAR NOT NULL,
        description VARCHAR NOT NULL,
        task VARCHAR NOT NULL,
        tags_json VARCHAR NOT NULL,
        params INTEGER NOT NULL,
        license VARCHAR NOT NULL,
        gated BOOLEAN NOT NULL,
        chat BOOLEAN NOT NULL,
        finetunable BOOLEAN NOT NULL,
        position INTEGER NOT NULL,
        updated_at FLOAT NOT NULL
    );
    CREATE TABLE model (
        id INTEGER NOT NULL PRIMARY KEY,
        name VARCHAR NOT NULL UNIQUE,
        kind VARCHAR NOT NULL,
        state VARCHAR NOT NULL,
        reason VARCHAR,
        source VARCHAR NOT NULL,
        repo_id VARCHAR,
        revision VARCHAR,
        path VARCHAR,
        owns_path BOOLEAN NOT NULL,
        size_bytes INTEGER,
        base_id INTEGER REFERENCES model (id),
        job_id INTEGER,
        meta_json VARCHAR NOT NULL,
        created_at FLOAT NOT NULL,
        updated_at FLOAT NOT NULL
    );
    CREATE TABLE job (
        id INTEGER NOT NULL PRIMARY KEY,
        kind VARCHAR NOT NULL,
        state VARCHAR NOT NULL,
        model_id INTEGER REFERENCES model (id) ON DELETE SET NULL,
        title VARCHAR NOT NULL,
        params_json VARCHAR NOT NULL,
        pid INTEGER,
        pid_started_at FLOAT,
        heartbeat_at FLOAT,
        progress FLOAT,
        bytes_done INTEGER,
        bytes_total INTEGER,
        rate FLOAT,
        eta_s FLOAT,
        metrics_json VARCHAR NOT NULL,
        log_path VARCHAR,
        error VARCHAR,
        created_at FLOAT NOT NULL,
        started_at FLOAT,
        finished_at FLOAT
    );
    CREATE TABLE event (
        id INTEGER NOT NULL PRIMARY KEY,
        at FLOAT NOT NULL,
        subject VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        message VARCHAR NOT NULL,
        data_json VARCHAR NOT NULL
    );
    """,
    # 2: deployments, cooperative job cancellation, and an index for "what happened to X".
    """
    CREATE TABLE deployment (
        id INTEGER NOT NULL PRIMARY KEY,
        model_id INTEGER REFERENCES model (id),
        name VARCHAR NOT NULL,
        backend VARCHAR NOT NULL,
        state VARCHAR NOT NULL,
        phase VARCHAR,
        reason VARCHAR,
        endpoint VARCHAR,
        served_name VARCHAR,
        api_key VARCHAR,
        gpus VARCHAR,
        job_id INTEGER,
        settings_json VARCHAR NOT NULL,
        created_at FLOAT NOT NULL,
        updated_at FLOAT NOT NULL
    );
    ALTER TABLE job ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT 0;
    CREATE INDEX ix_event_subject ON event (subject, id);
    """,
    # 3: chat conversations per deployment, kept to reopen.
    """
    CREATE TABLE conversation (
        id INTEGER NOT NULL PRIMARY KEY,
        deployment_id INTEGER NOT NULL REFERENCES deployment (id) ON DELETE CASCADE,
        title VARCHAR NOT NULL,
        system_prompt VARCHAR NOT NULL,
        params_json VARCHAR NOT NULL,
        created_at FLOAT NOT NULL,
        updated_at FLOAT NOT NULL
    );
    CREATE INDEX ix_conversation_deployment_id ON conversation (deployment_id);
    CREATE TABLE chat_message (
        id INTEGER NOT NULL PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversation (id) ON DELETE CASCADE,
        role VARCHAR NOT NULL,
        content VARCHAR NOT NULL,
        stats_json VARCHAR NOT NULL,
        created_at FLOAT NOT NULL
    );
    CREATE INDEX ix_chat_message_conversation_id ON chat_message (conversation_id);
    """,
    # 4: targets (engine/targets): a job's params name where it runs ("target"; its output folder, which
    # "target" held before, is "output"); a deployment's settings keep their target's options ("image" of a
    # Kubernetes one); the host a job's process runs on (a login node shares MODELDECK_HOME with others); when
    # a deployment's target ends it (a SLURM batch job's time limit).
    """
    ALTER TABLE deployment ADD COLUMN ends_at FLOAT;
    ALTER TABLE job ADD COLUMN host VARCHAR;
    UPDATE job SET params_json = json_set(json_remove(params_json, '$.target'), '$.output',
                                          json_extract(params_json, '$.target'))
        WHERE kind IN ('finetune', 'merge', 'import') AND json_type(params_json, '$.target') = 'text';
    UPDATE job SET params_json = json_set(params_json, '$.target', json_extract(params_json, '$.cluster.target'))
        WHERE json_type(params_json, '$.cluster.target') = 'text';
    UPDATE job SET params_json = json_set(params_json, '$.target', (SELECT json_extract(d.settings_json, '$.target')
                                                                   FROM deployment d
                                                                   WHERE d.id = json_extract(job.params_json,
                                                                                             '$.deployment_id')))
        WHERE kind = 'serve' AND json_extract(params_json, '$.on_cluster') = 1;
    UPDATE deployment SET settings_json = json_set(json_remove(settings_json, '$.image'), '$.options',
        json(CASE WHEN json_extract(settings_json, '$.image') <> ''
                  THEN json_object('image', json_extract(settings_json, '$.image')) ELSE '{}' END))
        WHERE json_type(settings_json, '$.options') IS NULL AND backend <> 'external';
    """,
    # 5: the adapters a deployment serves beside its base, each under its own name; a deployment of an adapter
    # served it so already (on its base, under the deployment's served name).
    """
    CREATE TABLE deployment_adapter (
        id INTEGER NOT NULL PRIMARY KEY,
        deployment_id INTEGER NOT NULL REFERENCES deployment (id) ON DELETE CASCADE,
        model_id INTEGER REFERENCES model (id) ON DELETE SET NULL,
        served_name VARCHAR NOT NULL,
        created_at FLOAT NOT NULL
    );
    CREATE INDEX ix_deployment_adapter_deployment_id ON deployment_adapter (deployment_id);
    INSERT INTO deployment_adapter (deployment_id, model_id, served_name, created_at)
        SELECT d.id, d.model_id, d.served_name, d.created_at FROM deployment d JOIN model m ON m.id = d.model_id
        WHERE m.kind = 'adapter' AND d.served_name IS NOT NULL;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

"""The end-to-end benchmark's Python baseline: the subscriber the background
document describes, a FastAPI app on the official Dapr Python SDK
(dapr, dapr-ext-fastapi), with its idempotency check through Dapr state:
a `processed:{sha256(type:data.id:time)}` marker, checked first and written
in one transaction with the task.

Run: DAPR_GRPC_PORT=... uvicorn python_subscriber:app --port APP_PORT
"""

import hashlib
import json

from dapr.clients import DaprClient
from dapr.clients.grpc._request import TransactionalStateOperation
from dapr.ext.fastapi import DaprApp
from fastapi import Body, FastAPI

app = FastAPI()
dapr_app = DaprApp(app)
client = DaprClient()


@dapr_app.subscribe(pubsub="pubsub", topic="task-created", route="/task-created")
def task_created(event=Body()):
    data = event["data"]
    key = hashlib.sha256(f"{event['type']}:{data['id']}:{event.get('time')}".encode()).hexdigest()
    marker = f"processed:{key}"
    if client.get_state("statestore", marker).data:
        return {"status": "SUCCESS"}
    client.execute_state_transaction(
        "statestore",
        [
            TransactionalStateOperation(key=f"task:{data['id']}", data=json.dumps(data)),
            TransactionalStateOperation(key=marker, data="1"),
        ],
    )
    audit = {"action": "created", "task_id": data["id"], "event_id": event["id"]}
    client.publish_event("pubsub", "task-audit", json.dumps(audit), data_content_type="application/json")
    return {"status": "SUCCESS"}

"""Bills an order: the SNS notification's Message is the order, as JSON."""

import json


def handler(event, context):
    billed = []
    for record in event["Records"]:
        sns = record["Sns"]
        order = json.loads(sns["Message"])
        total = round(sum(i["qty"] * i["price"] for i in order.get("items", [])), 2)
        tenant = sns["MessageAttributes"].get("tenant", {}).get("Value")
        print(f"billing order {order['id']} ({sns['Subject']}, tenant {tenant}): total {total:.2f}")
        billed.append({"order": order["id"], "total": total})
    return {"billed": billed}

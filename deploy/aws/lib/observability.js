// Where telemetry goes: one customer-managed key for every log group, the
// alert topic and the tokens secret; Amazon Managed Service for Prometheus
// with the alert rules of prometheus/alerts.yml (read at synth time: the
// rules exist once) and an alert manager that notifies an SNS topic.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { Aws, RemovalPolicy, Stack } = require('aws-cdk-lib');
const aps = require('aws-cdk-lib/aws-aps');
const iam = require('aws-cdk-lib/aws-iam');
const kms = require('aws-cdk-lib/aws-kms');
const logs = require('aws-cdk-lib/aws-logs');
const sns = require('aws-cdk-lib/aws-sns');
const { Construct } = require('constructs');

/** The repository's alert rules, the one source shared with Prometheus and Kubernetes. */
const ALERT_RULES = path.join(__dirname, '..', '..', '..', 'prometheus', 'alerts.yml');

class Observability extends Construct {
  constructor(scope, id) {
    super(scope, id);
    /** Encrypts the log groups, the alert topic and the tokens secret. */
    this.key = new kms.Key(this, 'Key', {
      description: 'eventflow: logs, alerts and tokens',
      enableKeyRotation: true,
      removalPolicy: RemovalPolicy.RETAIN,
    });
    this.key.addToResourcePolicy(new iam.PolicyStatement({
      sid: 'CloudWatchLogs',
      principals: [new iam.ServicePrincipal(`logs.${Aws.REGION}.amazonaws.com`)],
      actions: ['kms:Encrypt*', 'kms:Decrypt*', 'kms:ReEncrypt*', 'kms:GenerateDataKey*', 'kms:Describe*'],
      resources: ['*'],
      conditions: {
        ArnLike: { 'kms:EncryptionContext:aws:logs:arn': `arn:${Aws.PARTITION}:logs:${Aws.REGION}:${Aws.ACCOUNT_ID}:*` },
      },
    }));

    /** The service's logs (JSON lines). */
    this.serviceLogs = this.logGroup('ServiceLogs');
    /** The collector's own logs. */
    this.collectorLogs = this.logGroup('CollectorLogs');
    /** The NATS nodes' logs. */
    this.natsLogs = this.logGroup('NatsLogs');
    /** CloudWatch embedded-metric-format records: the autoscaling metrics. */
    this.metricLogs = this.logGroup('MetricLogs', logs.RetentionDays.ONE_WEEK);

    /** Alerts from the AMP alert manager. Subscribe the on-call rotation to it. */
    this.alerts = new sns.Topic(this, 'Alerts', {
      displayName: 'eventflow alerts',
      masterKey: this.key,
      enforceSSL: true,
    });
    this.alerts.addToResourcePolicy(new iam.PolicyStatement({
      principals: [new iam.ServicePrincipal('aps.amazonaws.com')],
      actions: ['sns:Publish', 'sns:GetTopicAttributes'],
      resources: [this.alerts.topicArn],
      conditions: { StringEquals: { 'AWS:SourceAccount': Aws.ACCOUNT_ID } },
    }));
    this.key.addToResourcePolicy(new iam.PolicyStatement({
      sid: 'ManagedPrometheusAlerts',
      principals: [new iam.ServicePrincipal('aps.amazonaws.com')],
      actions: ['kms:GenerateDataKey*', 'kms:Decrypt'],
      resources: ['*'],
    }));

    /** The Prometheus workspace the collectors write to. */
    this.workspace = new aps.CfnWorkspace(this, 'Prometheus', {
      alias: `eventflow-${Stack.of(this).stackName}`,
      alertManagerDefinition: alertManager(this.alerts.topicArn),
      loggingConfiguration: { logGroupArn: this.logGroup('PrometheusLogs').logGroupArn },
    });
    new aps.CfnRuleGroupsNamespace(this, 'AlertRules', {
      workspace: this.workspace.attrArn,
      name: 'eventflow',
      data: fs.readFileSync(ALERT_RULES, 'utf8'),
    });
    /** The workspace's remote-write URL. */
    this.remoteWriteUrl = `${this.workspace.attrPrometheusEndpoint}api/v1/remote_write`;
  }

  /** A log group encrypted with the stack's key, kept when the stack goes. */
  logGroup(id, retention = logs.RetentionDays.ONE_MONTH) {
    return new logs.LogGroup(this, id, {
      retention,
      encryptionKey: this.key,
      removalPolicy: RemovalPolicy.RETAIN,
    });
  }
}

/** The AMP alert manager's configuration: every alert to the SNS topic. */
function alertManager(topicArn) {
  return [
    'alertmanager_config: |',
    '  route:',
    '    receiver: sns',
    '    group_by: [alertname, job]',
    '    group_wait: 30s',
    '    repeat_interval: 4h',
    '  receivers:',
    '    - name: sns',
    '      sns_configs:',
    `        - topic_arn: ${topicArn}`,
    `          sigv4: {region: ${Aws.REGION}}`,
    '          subject: "eventflow: {{ .CommonLabels.alertname }}"',
    '',
  ].join('\n');
}

module.exports = { Observability };
